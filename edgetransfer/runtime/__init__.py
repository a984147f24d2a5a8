"""What runs on the device: open a bundle, preprocess frames per its manifest, run its backend.

Imports no torch (nor anything that does): a camera box installs `edgetransfer[runtime-openvino]`
or `edgetransfer[runtime-onnxruntime]` and nothing else.

    from edgetransfer.runtime import open_bundle
    with open_bundle("bundle/") as model:
        print(model.predict("part.png").label)
"""

from __future__ import annotations

from .model import BundleModel, Prediction, open_bundle

__all__ = ["BundleModel", "Prediction", "open_bundle"]
