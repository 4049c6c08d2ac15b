"""What a remote user can send a served app, and the faults it survives (issue 13).

Reducer weights and checkpoints that lie about their sizes, server paths, models too large
for the machine, the hub out of reach, read-only caches, the GPU running out of memory,
and processes killed mid-way. Each test names the fix it guards.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from analysis import CheckpointMismatchError, ModelLoadError, TokenScopeError, load_model
from analysis.access import ALLOWED_FOLDERS_ENV, allow_from_args, check_server_path
from analysis.errors import AccessError, DeviceMemoryError, ModelTooLargeError, OfflineError
from analysis.learned import backbone_id, init_weights, load_learned, read_metadata, save_learned
from tests.conftest import ROOT, tiny

# --------------------------------------------------------------------------- reducer weights

SCHEDULES = {
    "dtem": "dtem:r=4",
    "patchmerger": "patchmerger:tokens=8",
    "ltm": "ltm",
    "cropr": "cropr",
}


@pytest.fixture(scope="module")
def small():
    return tiny("vit_small_patch16_224")


def weights_file(model, folder: Path, method: str = "dtem") -> Path:
    weights = init_weights(model, [SCHEDULES[method]], seed=0)[method]
    path = folder / f"{method}.safetensors"
    save_learned(path, method, weights.modules, backbone_id(model), command="test")
    return path


def rewrite(path: Path, target: Path, *, metadata: dict | None = None, tensors=None) -> Path:
    """``path`` written again to ``target`` with other metadata or tensors."""
    save_file(
        tensors if tensors is not None else load_file(str(path)),
        str(target),
        metadata=metadata if metadata is not None else read_metadata(path),
    )
    return target


def max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def test_module_config_cannot_force_a_large_allocation(small, tmp_path):
    source = weights_file(small, tmp_path)
    meta = read_metadata(source)
    # A consistent lie: a 2,000,000-feature metric of a 384-wide backbone is 3 GB.
    config = json.loads(meta["module_config"]) | {"feat_dim": 2_000_000}
    bomb = rewrite(
        source, tmp_path / "bomb.safetensors", metadata=meta | {"module_config": json.dumps(config)}
    )
    before, start = max_rss_mb(), time.perf_counter()
    with pytest.raises(ModelLoadError, match=r"bomb.safetensors: its 'module_config' asks for "):
        load_learned(bomb, small)
    assert time.perf_counter() - start < 2 and max_rss_mb() - before < 300
    wide = meta | {"module_config": json.dumps(config | {"feat_dim": 64, "dim": 30000})}
    with pytest.raises(CheckpointMismatchError, match="30000 wide, but the backbone"):
        load_learned(rewrite(source, tmp_path / "wide.safetensors", metadata=wide))


@pytest.mark.parametrize("method", SCHEDULES)
def test_non_finite_weights_are_refused(small, tmp_path, method):
    source = weights_file(small, tmp_path, method)
    tensors = load_file(str(source))
    key = sorted(tensors)[0]
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[0] = float("nan")
    broken = rewrite(source, tmp_path / "nan.safetensors", tensors=tensors)
    with pytest.raises(CheckpointMismatchError, match=r"nan.safetensors.*NaN or infinite"):
        load_learned(broken, small)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("method", None, "no 'method' in its metadata"),
        ("method", "nonsense", "unknown method"),
        ("backbone", None, "no 'backbone'"),
        ("backbone_dim", "x", "'backbone_dim' in its metadata must be a whole number"),
        ("backbone_depth", "99999999", "'backbone_depth' .* from 1 to 1024"),
        ("module_config", None, "no 'module_config'"),
        ("module_config", "{", "not valid JSON"),
        ("module_config", "[1, 2]", "must be an object"),
        ("module_config", '{"dim": 384, "bogus": 1}', "does not describe a DTEM module"),
        ("module_config", '{"dim": 384, "feat_dim": "wide"}', "does not describe"),
        ("layers", None, "no 'layers'"),
        ("layers", "[99]", "'layers' must list distinct layers from 0 to 3"),
        ("layers", "[0, 0]", "'layers' must list distinct"),
        ("layers", "[true]", "'layers' must list distinct"),
        ("layers", '"0-3"', "'layers' must list distinct"),
    ],
)
def test_damaged_metadata_is_named_not_a_traceback(small, tmp_path, field, value, message):
    source = weights_file(small, tmp_path)
    meta = read_metadata(source)
    if value is None:
        meta.pop(field)
    else:
        meta[field] = value
    damaged = rewrite(source, tmp_path / "mine.safetensors", metadata=meta)
    with pytest.raises(ModelLoadError, match=message) as error:
        load_learned(damaged, small)
    assert "mine.safetensors" in str(error.value)


def test_tensors_that_do_not_match_the_config_are_refused(small, tmp_path):
    source = weights_file(small, tmp_path)
    tensors = load_file(str(source))
    tensors["layers.0.proj.weight"] = torch.zeros(8, 384)
    tensors["layers.1.extra"] = torch.zeros(2)
    tensors["layers.2.proj.bias"] = torch.zeros(64, dtype=torch.int64)
    del tensors["layers.3.proj.bias"]
    for layer, message in ((0, "shape: proj.weight"), (1, "unexpected: extra"), (2, "int64")):
        single = {k: v for k, v in tensors.items() if k.startswith(f"layers.{layer}.")}
        meta = read_metadata(source) | {"layers": json.dumps([layer])}
        path = rewrite(source, tmp_path / f"l{layer}.safetensors", metadata=meta, tensors=single)
        with pytest.raises(CheckpointMismatchError, match=message):
            load_learned(path, small)


def dtem_checkpoint(path: Path, blocks: dict[int, dict[str, torch.Tensor]], **extra) -> Path:
    state = {
        f"blocks.{layer}.attn.qkv.metric_layer.{name}": value
        for layer, parts in blocks.items()
        for name, value in parts.items()
    }
    state.update(extra)
    torch.save({"model": state}, path)
    return path


@pytest.mark.parametrize(
    ("blocks", "message"),
    [
        ({0: {"bias": torch.zeros(4)}}, r"metric_layer.weight must be a matrix"),
        ({0: {"weight": torch.zeros(384)}}, r"must be a matrix \[features, dim\], got \(384,\)"),
        ({0: {"weight": torch.zeros(4, 384), "bias": torch.zeros(5)}}, "bias has shape"),
        ({99: {"weight": torch.zeros(4, 384)}}, "block 99: the backbone has 4 blocks"),
        ({0: {"weight": torch.full((4, 384), float("inf"))}}, "NaN or infinite"),
        ({0: {"weight": torch.zeros(4, 384)}, 1: {"weight": torch.zeros(5, 384)}}, "different"),
        ({0: {"weight": torch.zeros(4, 100)}}, "for dim 100, but"),
        ({0: {"weight": torch.zeros(4, 384, dtype=torch.int8)}}, "int8 values, not weights"),
    ],
)
def test_malformed_official_dtem_checkpoints(small, tmp_path, blocks, message):
    path = dtem_checkpoint(tmp_path / "dtem.pth", blocks)
    with pytest.raises(ModelLoadError, match=message):
        load_learned(path, small)


def test_official_checkpoint_from_a_deeper_backbone_is_refused(small, tmp_path):
    deep_qkv = {"blocks.40.attn.qkv.qkv_layer.weight": torch.zeros(1152, 384)}
    path = dtem_checkpoint(tmp_path / "deep.pth", {0: {"weight": torch.zeros(4, 384)}}, **deep_qkv)
    with pytest.raises(CheckpointMismatchError, match="qkv weights for block 40, but"):
        load_learned(path, small)


# --------------------------------------------------------------------------- models


def test_a_model_too_large_is_refused_before_it_is_built(monkeypatch):
    monkeypatch.setenv("TOKENSCOPE_MAX_MODEL_GB", "0.05")
    with pytest.raises(ModelTooLargeError, match=r"vit_small_patch16_224 needs about 0.1 GiB"):
        load_model("vit_small_patch16_224", weights="random")


def test_a_giant_model_costs_nothing_to_refuse():
    before, start = max_rss_mb(), time.perf_counter()
    with pytest.raises(ModelLoadError, match="vit_7b_patch16_dinov3 is a Eva, not a timm"):
        load_model("vit_7b_patch16_dinov3", weights="random")  # 25 GiB if it were built
    assert max_rss_mb() - before < 1000 and time.perf_counter() - start < 60


def test_offline_hub_is_detected_in_seconds(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # the flag is read at import
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # nothing cached
    monkeypatch.setenv("HF_ENDPOINT", "https://127.0.0.1:9")  # nothing listens there
    start = time.perf_counter()
    with pytest.raises(OfflineError, match=r"127.0.0.1 cannot be reached") as error:
        load_model("deit_tiny_patch16_224", weights="hub")
    assert time.perf_counter() - start < 10
    assert error.value.model == "deit_tiny_patch16_224"


def test_long_and_odd_names_are_refused_briefly():
    with pytest.raises(ModelLoadError, match="unknown timm model") as error:
        load_model("v" * 5000, weights="random")
    assert len(str(error.value)) < 300
    with pytest.raises(ModelLoadError, match="checkpoint not found") as error:
        load_model("test_vit", weights="/nowhere/" + "a" * 5000 + ".pth")
    assert len(str(error.value)) < 300


# --------------------------------------------------------------------------- server paths


def test_server_paths_are_off_by_default_and_say_nothing_about_the_file(tmp_path, monkeypatch):
    monkeypatch.delenv(ALLOWED_FOLDERS_ENV, raising=False)
    real = tmp_path / "real.safetensors"
    real.write_bytes(b"x")
    messages = []
    for path in (real, tmp_path / "missing.safetensors", "/etc/passwd"):
        with pytest.raises(AccessError) as error:
            check_server_path(path, what="checkpoint")
        messages.append(str(error.value))
    assert len(set(messages)) == 1 and "upload the checkpoint instead" in messages[0]


def test_only_allowed_folders_can_be_read(tmp_path, monkeypatch):
    allowed, outside = tmp_path / "models", tmp_path / "private"
    allowed.mkdir()
    outside.mkdir()
    (outside / "secret.pt").write_bytes(b"x")
    (allowed / "link.pt").symlink_to(outside / "secret.pt")
    monkeypatch.setenv(ALLOWED_FOLDERS_ENV, str(allowed))
    assert check_server_path(allowed / "a.pt") == (allowed / "a.pt").resolve()
    refused = [
        outside / "secret.pt",
        allowed / ".." / "private" / "secret.pt",
        allowed / "link.pt",
        "x" * 5000,
        "a\0b",
    ]
    for path in refused:
        with pytest.raises(AccessError):
            check_server_path(path)


def test_the_app_flag_allows_folders(monkeypatch):
    monkeypatch.setenv(ALLOWED_FOLDERS_ENV, "/srv/a")
    assert allow_from_args(["--allow-folder", "/srv/b", "--allow-folder=/srv/c"]) == [
        "/srv/b",
        "/srv/c",
    ]
    assert os.environ[ALLOWED_FOLDERS_ENV].split(os.pathsep) == ["/srv/a", "/srv/b", "/srv/c"]


def test_served_app_shows_messages_not_tracebacks_and_listens_locally():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    config = tomllib.loads((ROOT / ".streamlit" / "config.toml").read_text())
    assert config["client"]["showErrorDetails"] == "none"
    assert config["server"]["address"] == "127.0.0.1"
    assert config["server"]["enableXsrfProtection"] is True


# --------------------------------------------------------------------------- command line


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            [
                "flops",
                "--model",
                "test_vit",
                "--weights",
                "random",
                "--schedule",
                "tome@0-99999999",
            ],
            "beyond any model",
        ),
        (
            [
                "flops",
                "--model",
                "test_vit",
                "--weights",
                "random",
                "--schedule",
                '{"parts": [{"method": "tome", "params": {"r": [[8]]}}]}',
            ],
            "flat list",
        ),
        (
            ["run", "--model", "test_vit", "--weights", "random", "--image", "EMPTY"],
            "empty.png is empty (0 bytes)",
        ),
        (["flops", "--model", "test_vit", "--weights", "/nowhere/w.pth"], "checkpoint not found"),
    ],
)
def test_cli_errors_exit_2_with_a_message(tmp_path, argv, message):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    argv = [str(empty) if item == "EMPTY" else item for item in argv]
    done = subprocess.run(
        [sys.executable, "-m", "analysis", *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 2, done.stderr
    assert message in done.stderr and "Traceback" not in done.stderr


# --------------------------------------------------------------------------- faults


@pytest.fixture(scope="module")
def four_images():
    from analysis.imagesets import image_set_of

    rng = torch.Generator().manual_seed(0)
    pictures = [
        Image.fromarray((torch.rand(70, 90, 3, generator=rng) * 255).byte().numpy())
        for _ in range(6)
    ]
    return image_set_of([(f"img{i}", p) for i, p in enumerate(pictures)])


def test_sweep_goes_on_in_smaller_batches_when_the_gpu_is_full(monkeypatch, four_images):
    """The engine's out-of-memory error on batches over two images (an injected fault):
    the sweep halves its batches, says so once per step, and gets the same numbers."""
    import analysis.sweep as sweep
    from analysis.engine import run as real_run

    model = tiny("vit_small_patch16_224")
    plan = sweep.plan_sweep(model, schedules=["tome:r=2", "evit:keep=0.5@1"])
    plain = list(sweep.run_sweep(model, four_images, plan, batch_size=6))

    def crowded(model, images, schedule=None, **kwargs):
        if images.shape[0] > 2:
            raise DeviceMemoryError("the CUDA ran out of memory", batch=images.shape[0])
        return real_run(model, images, schedule, **kwargs)

    monkeypatch.setattr(sweep, "run", crowded)
    notices: list[str] = []
    points = list(sweep.run_sweep(model, four_images, plan, batch_size=6, on_notice=notices.append))
    assert [p.schedule for p in points] == [p.schedule for p in plain]
    for got, expected in zip(points, plain, strict=True):
        for metric, values in expected.values.items():
            assert got.values[metric] == pytest.approx(values, abs=1e-5)
    assert notices == [
        "The GPU ran out of memory on a batch of 6 images; the sweep goes on in batches of 3.",
        "The GPU ran out of memory on a batch of 3 images; the sweep goes on in batches of 1.",
    ]


def test_out_of_memory_on_one_image_on_the_cpu_is_a_clear_error(monkeypatch, four_images):
    import analysis.sweep as sweep

    def full(*args, **kwargs):
        raise DeviceMemoryError("out of memory", batch=1)

    model = tiny("vit_small_patch16_224")
    plan = sweep.plan_sweep(model, schedules=["tome:r=2"])
    monkeypatch.setattr(sweep, "run", full)
    with pytest.raises(TokenScopeError, match="even on the CPU"):
        list(sweep.run_sweep(model, four_images, plan, batch_size=2))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cpu_replica_gives_the_gpu_results():
    from analysis.engine import cpu_replica, run

    model = tiny("vit_small_patch16_224")
    gpu = load_model("vit_small_patch16_224", weights="random", device="cuda")
    images = torch.randn(2, 3, 224, 224)
    replica = cpu_replica(gpu)
    assert replica.device.type == "cpu" and gpu.device.type == "cuda"
    assert torch.allclose(run(replica, images).features, run(gpu, images).features.cpu(), atol=1e-3)
    del model


def unwritable(tmp_path: Path) -> Path:
    """A folder that cannot be created, even by root: its parent is a file."""
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a folder")
    return blocker / "cache"


def test_a_read_only_cache_does_not_stop_a_sweep(tmp_path, four_images):
    from analysis.sweep import plan_sweep, run_sweep
    from analysis.sweep_cache import SweepCache

    model = tiny("vit_small_patch16_224")
    plan = plan_sweep(model, schedules=["tome:r=2"])
    notices: list[str] = []
    cache = SweepCache(unwritable(tmp_path))
    points = list(run_sweep(model, four_images, plan, cache=cache, on_notice=notices.append))
    assert len(points) == 2 and not any(point.cached for point in points)
    assert len(notices) == 1 and "cannot be written" in notices[0]
    assert "TOKENSCOPE_CACHE" in notices[0]


def test_a_corrupt_resume_file_is_explained(tmp_path):
    from analysis.train import TrainConfig, resume_path, train

    out = tmp_path / "w.safetensors"
    resume_path(out).write_bytes(b"cut short")
    folder = tmp_path / "images"
    folder.mkdir()
    for index in range(4):
        Image.new("RGB", (64, 64), (index * 40, 0, 0)).save(folder / f"{index}.png")
    config = TrainConfig(
        schedules=("ltm:keep=0.7",),
        out=out,
        data=str(folder),
        steps=2,
        batch_size=2,
        progress=False,
        checkpoint_every=0,
        val=0,
        mix=0.0,
        augment=False,
        resume=True,
    )
    with pytest.raises(TokenScopeError, match=r"the resume file w\.safetensors\.resume\.pt cannot"):
        train(tiny("vit_small_patch16_224", num_classes=0), config)


# --------------------------------------------------------------------------- killed mid-way


def _start(argv: list[str], cache: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "TOKENSCOPE_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "analysis", *argv],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=log.open("w"),
    )


def _wait_for(condition, process: subprocess.Popen, timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, log.read_text()[-2000:]
        assert time.monotonic() < deadline, "timed out:\n" + log.read_text()[-2000:]
        time.sleep(0.2)


def test_a_killed_sweep_resumes_from_its_cache(tmp_path):
    cache = tmp_path / "cache"
    argv = [
        "sweep",
        "--model",
        "vit_small_patch16_224",
        "--weights",
        "random",
        "--images",
        "samples",
        "--limit",
        "3",
        "--batch",
        "1",
        "--method",
        "tome",
        "--values",
        "tome=1,2,3,4,5,6,7,8,9,10,11,12",
        "--device",
        "cpu",
        "--metric",
        "feature_cosine",
    ]
    records = cache / "sweeps"

    def finished() -> list[Path]:
        return list(records.rglob("*.json")) if records.exists() else []

    log = tmp_path / "first.log"
    first = _start(argv, cache, log)
    try:
        _wait_for(lambda: len(finished()) >= 2, first, 600, log)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    kept = {path.name for path in finished()}
    for path in records.rglob("*"):
        if path.is_file() and path.suffix == ".json":
            json.loads(path.read_text())  # never half a file
    out = tmp_path / "results.json"
    second = subprocess.run(
        [sys.executable, "-m", "analysis", *argv, "--out", str(out), "--quiet"],
        cwd=ROOT,
        env={**os.environ, "TOKENSCOPE_CACHE": str(cache), "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert second.returncode == 0, second.stderr[-2000:]
    points = json.loads(out.read_text())["points"]
    assert len(points) == 13
    assert sum(point["cached"] for point in points) >= len(kept)
    assert kept <= {path.name for path in finished()}


def test_killed_training_resumes_without_losing_steps(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for index in range(6):
        Image.new("RGB", (64, 64), (index * 40, 100, 0)).save(folder / f"{index}.png")
    out = tmp_path / "ltm.safetensors"
    argv = [
        "train",
        "--schedule",
        "ltm:keep=0.7",
        "--model",
        "vit_tiny_patch16_224",
        "--weights",
        "random",
        "--img-size",
        "64",
        "--data",
        str(folder),
        "--steps",
        "400",
        "--batch-size",
        "2",
        "--no-augment",
        "--checkpoint-every",
        "3",
        "--val",
        "0",
        "--quiet",
        "--out",
        str(out),
    ]
    resume = out.with_name(out.name + ".resume.pt")
    log = tmp_path / "train.log"
    first = _start(argv, tmp_path / "cache", log)

    def saved_step() -> int:
        try:
            return int(torch.load(resume, weights_only=True)["step"])
        except Exception:  # not there yet, or being replaced
            return 0

    try:
        _wait_for(lambda: saved_step() >= 6, first, 600, log)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    done = int(torch.load(resume, weights_only=True)["step"])
    second = subprocess.run(
        [sys.executable, "-m", "analysis", *argv, "--resume", "--stop-after", "3"],
        cwd=ROOT,
        env={**os.environ, "TOKENSCOPE_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert second.returncode == 0, second.stderr[-2000:]
    assert read_metadata(out)["steps"] == str(done + 3)  # the killed run's steps are kept
    assert load_learned(out).method == "ltm"


# --------------------------------------------------------------------------- served pictures


def test_a_picture_survives_another_sessions_cleanup_during_a_rerun():
    """The broken images under concurrent sessions: session A's rerun drops its
    references; session B's run ends (cleanup); A's browser fetches its picture."""
    from streamlit.runtime.media_file_manager import MediaFileManager
    from streamlit.runtime.memory_media_file_storage import MemoryMediaFileStorage

    from app_pages.media import keep_media_files

    def race(manager: MediaFileManager) -> bool:
        url = manager.add(b"\x89PNG picture", "image/png", "coords")  # A draws it
        manager.clear_session_refs()  # A's rerun starts
        manager.remove_orphaned_files()  # B's run ends meanwhile
        return manager.read_file(url.rsplit("/", 1)[-1]) is not None  # A's browser fetches

    assert not race(MediaFileManager(MemoryMediaFileStorage("/media")))  # Streamlit's rule
    kept = MediaFileManager(MemoryMediaFileStorage("/media"))
    assert keep_media_files(kept, grace_s=60)
    assert race(kept)
    gone = MediaFileManager(MemoryMediaFileStorage("/media"))
    assert keep_media_files(gone, grace_s=1e-9)  # past its grace period a file goes
    gone.add(b"old", "image/png", "c")
    gone.clear_session_refs()
    gone.remove_orphaned_files()
    time.sleep(0.01)
    gone.remove_orphaned_files()
    assert not gone._file_metadata


def test_a_read_only_cache_still_gives_the_default_model(tmp_path, monkeypatch):
    from analysis.default_model import default_checkpoint

    monkeypatch.setenv("TOKENSCOPE_CACHE", str(unwritable(tmp_path)))
    with pytest.warns(UserWarning, match="is not writable.*Set TOKENSCOPE_CACHE"):
        path, spec = default_checkpoint()
    assert path.exists() and not str(path).startswith(str(tmp_path))
    assert spec.img_size > 0
