"""The device runtime: `open_bundle(...).predict`, frames from images, video and cameras, `bench`,
and that none of it needs torch — checked with torch blocked here, and (in CI) in a clean virtual
environment that has only the runtime extra installed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from edgetransfer.cli import main
from edgetransfer.errors import UsageError
from edgetransfer.runtime import open_bundle

REPO = Path(__file__).resolve().parents[1]


def _test_images(tiny_data: Path) -> list[Path]:
    return sorted((tiny_data / "test").rglob("*.png"))


def test_predict_takes_paths_pil_images_and_rgb_or_bgr_arrays(bundles, tiny_data):
    path = _test_images(tiny_data)[0]
    rgb = np.asarray(Image.open(path).convert("RGB"))
    with open_bundle(bundles["intel-cpu"]) as model:
        by_path = model.predict(path)
        assert by_path.label in model.classes and 0.0 < by_path.score <= 1.0 and by_path.latency_ms > 0
        for frame, color in ((Image.fromarray(rgb), "RGB"), (rgb, "RGB"), (rgb[..., ::-1].copy(), "BGR")):
            p = model.predict(frame, color=color)
            np.testing.assert_array_equal(p.logits, by_path.logits)
        # the colour order matters: a BGR frame taken for RGB is a different input
        assert not np.array_equal(model.preprocess(rgb[..., ::-1].copy()), model.preprocess(rgb))
        batch = model.predict_batch([path, rgb])
        assert [p.label for p in batch] == [by_path.label] * 2
        with pytest.raises(UsageError, match="uint8"):
            model.predict(rgb.astype(np.float32))


def _write_clip(path: Path, images: list[Path], size: int = 64) -> list[np.ndarray]:
    """An MJPG .avi of the images (BGR frames, as OpenCV writes and reads them); returns the frames written."""
    cv2 = pytest.importorskip("cv2", reason="video input needs OpenCV: pip install 'edgetransfer[video]'")
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (size, size))
    assert writer.isOpened()
    frames = []
    for p in images:
        bgr = np.asarray(Image.open(p).convert("RGB").resize((size, size)))[..., ::-1].copy()
        writer.write(bgr)
        frames.append(bgr)
    writer.release()
    return frames


def test_video_file_frames_are_predicted_in_order(bundles, tiny_data, tmp_path):
    cv2 = pytest.importorskip("cv2", reason="video input needs OpenCV: pip install 'edgetransfer[video]'")
    images = _test_images(tiny_data)
    clip = tmp_path / "line.avi"
    _write_clip(clip, images)
    result = CliRunner().invoke(main, ["infer", str(bundles["x86-onnxruntime"]), str(clip)])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["frame"] for r in records] == list(range(len(images)))
    # each record is what the model says about that decoded frame, taken as BGR and converted per the manifest
    cap = cv2.VideoCapture(str(clip))
    with open_bundle(bundles["x86-onnxruntime"]) as model:
        for r in records:
            ok, frame = cap.read()
            assert ok
            rgb_pred = model.predict(np.ascontiguousarray(frame[..., ::-1]))
            assert (r["class"], r["score"]) == (rgb_pred.label, round(rgb_pred.score, 6))
    cap.release()
    assert "frames" in result.stderr and "cold start" in result.stderr

    result = CliRunner().invoke(main, ["infer", str(bundles["x86-onnxruntime"]), str(clip), "--every", "3",
                                       "--max-frames", "2"])
    assert [json.loads(line)["frame"] for line in result.stdout.splitlines()] == [0, 3]


def test_bad_sources_name_themselves(bundles, tmp_path):
    b = str(bundles["x86-onnxruntime"])
    result = CliRunner().invoke(main, ["infer", b, str(tmp_path / "nope.png")])
    assert result.exit_code == 2 and "nope.png" in result.output
    result = CliRunner().invoke(main, ["infer", b, "camera:front"])
    assert result.exit_code == 2 and "camera:N" in result.output
    broken = tmp_path / "frames"
    broken.mkdir()
    (broken / "a.png").write_bytes(b"not a png")
    Image.new("RGB", (40, 40), (90, 90, 90)).save(broken / "b.png")
    result = CliRunner().invoke(main, ["infer", b, str(broken)])
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert result.exit_code == 2 and "error" in records[0] and "class" in records[1]


def test_bench_reports_every_batch_size_the_target_allows(bundles, shipped_run, tmp_path):
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(main, ["bench", str(bundles["x86-onnxruntime.tar.gz"]), "--iterations", "5",
                                       "--min-seconds", "0", "--json", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert [r["batch"] for r in report["results"]] == [1, 8]  # the target's min/opt 1 and max 8
    for r in report["results"]:
        assert 0 < r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"] and r["images_per_s"] > 0
    assert report["cold_start_ms"] > 0 and "p99 ms" in result.output
    result = CliRunner().invoke(main, ["bench", str(shipped_run), "--target", "intel-cpu", "--batch", "2",
                                       "--iterations", "3", "--min-seconds", "0"])
    assert result.exit_code == 0, result.output
    assert "openvino" in result.output


_BLOCK_TORCH = """
import sys
class _NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'torchvision', 'safetensors'):
            raise ImportError(f'{name} is blocked: the device runtime must not need it')
sys.meta_path.insert(0, _NoTorch())
"""


def test_runtime_verify_infer_and_bench_run_with_torch_blocked(bundles, tiny_data):
    code = _BLOCK_TORCH + f"""
from click.testing import CliRunner
from edgetransfer.cli import main
from edgetransfer.runtime import open_bundle
for b in ({str(bundles['intel-cpu'])!r}, {str(bundles['x86-onnxruntime.tar.gz'])!r}):
    for args in (['verify', b, '--allow-failed'], ['infer', b, {str(tiny_data / 'test')!r}],
                 ['bench', b, '--iterations', '2', '--min-seconds', '0']):
        r = CliRunner().invoke(main, args)
        assert r.exit_code == 0, (args, r.output, r.exception)
    with open_bundle(b) as model:
        model.predict({str(_test_images(tiny_data)[0])!r})
assert not [m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision')]
print('ok')
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")


@pytest.mark.skipif(not os.environ.get("EDGETRANSFER_RUNTIME_PYTHON"),
                    reason="set EDGETRANSFER_RUNTIME_PYTHON to a runtime-only venv's python (`make test` does)")
def test_clean_runtime_venv_without_torch(bundles, tiny_data):
    """The runtime extra, installed alone: verify, infer and bench a bundle made by the full install."""
    python = os.environ["EDGETRANSFER_RUNTIME_PYTHON"]

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([python, *args], capture_output=True, text=True, timeout=300,
                              env={**os.environ, "EDGETRANSFER_PROGRESS": "0"})

    no_torch = run("-c", "import torch")
    assert no_torch.returncode != 0 and "No module named 'torch'" in no_torch.stderr
    bundle = str(bundles["x86-onnxruntime.tar.gz"])
    assert run("-m", "edgetransfer", "verify", bundle, "--allow-failed").returncode == 0  # made with allow_failed
    # an OpenVINO bundle where only the ONNX Runtime extra is installed: the device's extra is named
    openvino = run("-m", "edgetransfer", "verify", str(bundles["intel-cpu"]), "--allow-failed")
    assert openvino.returncode == 3 and "edgetransfer[runtime-openvino]" in openvino.stderr, openvino.stderr
    infer = run("-m", "edgetransfer", "infer", bundle, str(tiny_data / "test"))
    assert infer.returncode == 0, infer.stderr
    here = CliRunner().invoke(main, ["infer", bundle, str(tiny_data / "test")])
    strip = lambda text: [{k: v for k, v in json.loads(line).items() if not k.endswith("_ms")}  # noqa: E731
                          for line in text.splitlines()]
    assert strip(infer.stdout) == strip(here.stdout)
    bench = run("-m", "edgetransfer", "bench", bundle, "--iterations", "2", "--min-seconds", "0")
    assert bench.returncode == 0, bench.stderr
    check = run("-c", "import sys, edgetransfer.runtime, edgetransfer.bundle, edgetransfer.cli; "
                      "assert 'torch' not in sys.modules; print(edgetransfer.runtime.__file__)")
    assert check.returncode == 0, check.stderr


def test_the_runtime_imports_no_workstation_module():
    """The device runtime stands on the bundle format alone: not the writer, validate, the stages or torch."""
    code = ("import sys, edgetransfer.runtime, edgetransfer.runtime.infer, edgetransfer.runtime.sources; "
            "print(' '.join(sorted(m for m in sys.modules if m.startswith(('edgetransfer', 'torch', 'onnx.')))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr
    loaded = set(out.stdout.split())
    assert "edgetransfer.bundleformat" in loaded
    for workstation in ("edgetransfer.bundle", "edgetransfer.validate", "edgetransfer.stages", "edgetransfer.quantize",
                        "edgetransfer.export", "edgetransfer.adapt", "torch"):
        assert workstation not in loaded, f"{workstation} imported by the device runtime: {sorted(loaded)}"


def test_overlays_from_a_classifier_bundle_are_refused_before_any_frame(bundles, tiny_data, tmp_path):
    out = tmp_path / "overlays"
    result = CliRunner().invoke(main, ["infer", str(bundles["x86-onnxruntime"]), str(tiny_data / "test"),
                                       "--overlays", str(out)])
    assert result.exit_code == 2, result.output
    assert "anomaly bundle" in result.output and not out.exists()
    assert not [line for line in result.stdout.splitlines() if line.startswith("{")]
