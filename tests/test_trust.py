"""Trust at scale (issue 6): run records, SIGKILL and resume, the run-folder lock, non-finite
losses, and refusing checkpoints that hold code.

The kill tests start real `weakseg` processes, kill them with SIGKILL at a chosen moment
(mid-epoch; in the middle of the pipeline), run the same command again in the same folder and
compare everything it ends with against an uninterrupted run of the same seed: weights bit for
bit, metrics exactly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from weakseg.errors import DataError, NonFiniteLoss
from weakseg.record import LOCK_NAME, RunLocked, find_seeds, folder_lock, manifest, read_record, sha256_file, verify_outputs
from weakseg.steps import infer_cam, pipeline

# SEAM on the tiny CNN with dropout 0.5: the dropout masks come from torch's global generator,
# so a resume that did not restore it would end with other weights.
CAM_TRAIN = {"epochs": 3, "batch_size": 8, "optimizer": "adamw", "lr": 0.003, "weight_decay": 0.0001,
             "augment": {"crop_size": None, "scale_range": [1.0, 1.0], "hflip_prob": 0.5}}
CAM_MODEL = {"method": "seam", "backbone": "tiny_cnn", "backbone_args": {"width": 8, "output_stride": 4},
             "method_args": {"dropout": 0.5}}
CAM_LOSS = {"classification": {"kind": "gap"}, "seam": {}}
DATASET = {"kind": "synthetic", "num_images": 48, "image_size": 40}


def cam_config(**train) -> dict:
    """A train_cam + infer_cam config; `train` changes train_cam.train."""
    return {"dataset": DATASET, "train_cam": {"model": CAM_MODEL, "loss": CAM_LOSS, "train": dict(CAM_TRAIN, **train)},
            "infer_cam": {"scales": [1.0], "flip": False}}


CAM = cam_config()
PIPELINE = {
    "dataset": {"kind": "synthetic", "num_images": 32, "image_size": 40},
    "train_cam": {"model": CAM_MODEL, "loss": CAM_LOSS, "train": dict(CAM_TRAIN, epochs=2)},
    "infer_cam": {"scales": [1.0], "flip": False},
    "refine": {"method": "pamr", "pamr_iterations": 2},
    "pseudo_labels": {"confidence": 0.3},
    "train_seg": {
        "model": {"backbone": "tiny_cnn", "backbone_args": {"width": 8, "output_stride": 4}, "aspp_channels": 8},
        "train": dict(CAM_TRAIN, epochs=3, optimizer="sgd", lr=0.01),
    },
    "predict": {"scales": [1.0], "flip": False},
    "evaluate": {},
}
ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def weakseg(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "weakseg", *args], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out
    return out


def wait_until(proc: subprocess.Popen, ready, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"the process ended (code {proc.returncode}) before {what}: {proc.stdout.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def log_rows(run: Path) -> list[str]:
    path = run / "log.csv"
    return path.read_text().splitlines()[1:] if path.exists() else []


def assert_same_weights(a_path: Path, b_path: Path) -> None:
    a = torch.load(a_path, weights_only=True)["model"]
    b = torch.load(b_path, weights_only=True)["model"]
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def test_sigkill_mid_epoch_then_resume_ends_like_an_uninterrupted_run(tmp_path):
    full_cfg = write_yaml(tmp_path / "full.yaml", CAM | {"out": str(tmp_path / "full")})
    killed_cfg = write_yaml(tmp_path / "killed.yaml", CAM | {"out": str(tmp_path / "killed")})
    finish(weakseg("train-cam", str(full_cfg)))

    killed = tmp_path / "killed" / "train_cam"
    proc = weakseg("train-cam", str(killed_cfg))
    # 6 steps per epoch: wait for the epoch-1 checkpoint and two logged steps of epoch 2.
    wait_until(proc, lambda: len(log_rows(killed)) >= 8, "two steps of epoch 2")
    os.kill(proc.pid, signal.SIGSTOP)  # frozen where it is: mid-epoch, holding its lock
    assert len(log_rows(killed)) < 18, "the run ended before it could be stopped"
    # While it runs, the folder is locked: a second run there is refused, with the holder named.
    second = subprocess.run([sys.executable, "-m", "weakseg", "train-cam", str(killed_cfg)], env=ENV,
                            capture_output=True, text=True, timeout=120)
    assert second.returncode == 2
    said = " ".join((second.stdout + second.stderr).split())
    assert "another weakseg run is using this folder" in said and f"pid {proc.pid}" in said
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert torch.load(killed / "checkpoint.pt", weights_only=True)["epoch"] in (1, 2)
    assert not (killed / "cam_model.pt").exists()
    assert read_record(killed)["status"] == "running"  # the killed process never finished it

    finish(weakseg("train-cam", str(killed_cfg)))  # the same command: resumes (the lock died with it)
    full = tmp_path / "full" / "train_cam"
    assert_same_weights(full / "cam_model.pt", killed / "cam_model.pt")
    assert (killed / "log.csv").read_text() == (full / "log.csv").read_text()
    metrics = [pipeline.run_step("infer_cam", cfg, log=lambda m: None) for cfg in (full_cfg, killed_cfg)]
    assert metrics[0] == metrics[1]
    record = read_record(killed)
    assert record["status"] == "completed" and record["seeds"] == {"train_cam.train.seed": 0}


def test_resume_without_the_global_generator_would_differ(tmp_path, monkeypatch):
    # The dropout masks really depend on the restored generator: a resume that skips it ends
    # with other weights (so the kill test above can fail).
    from weakseg.train import trainer

    full_cfg = write_yaml(tmp_path / "full.yaml", cam_config(epochs=2) | {"out": str(tmp_path / "full")})
    part_cfg = write_yaml(tmp_path / "part.yaml", cam_config(epochs=2) | {"out": str(tmp_path / "part")})
    pipeline.run_step("train_cam", full_cfg, log=lambda m: None)

    def crash(step, total):
        if step == 8:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pipeline.run_step("train_cam", part_cfg, log=lambda m: None, progress=crash)
    torch.manual_seed(12345)  # what a fresh process would not have: any other global state
    monkeypatch.setattr(trainer, "restore_global_rng", lambda state: None)
    pipeline.run_step("train_cam", part_cfg, log=lambda m: None)
    a = torch.load(tmp_path / "full" / "train_cam" / "cam_model.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "part" / "train_cam" / "cam_model.pt", weights_only=True)["model"]
    assert any(not torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def uninterrupted_pipeline(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("uninterrupted")
    finish(weakseg("run", str(write_yaml(folder / "full.yaml", PIPELINE | {"out": str(folder / "full")}))))
    return folder / "full"


@pytest.mark.parametrize("kill_when", ["train_cam mid-epoch", "refine started", "train_seg mid-epoch"])
def test_pipeline_sigkill_then_rerun_gives_the_uninterrupted_results(tmp_path, kill_when, uninterrupted_pipeline):
    full = uninterrupted_pipeline
    killed_cfg = write_yaml(tmp_path / "killed.yaml", PIPELINE | {"out": str(tmp_path / "killed")})
    killed = tmp_path / "killed"
    ready = {
        "train_cam mid-epoch": lambda: len(log_rows(killed / "train_cam")) >= 7,
        "refine started": lambda: (killed / "refine" / "started.json").exists(),
        "train_seg mid-epoch": lambda: len(log_rows(killed / "train_seg")) >= 5,
    }[kill_when]
    proc = weakseg("run", str(killed_cfg))
    wait_until(proc, ready, kill_when)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert not (killed / "results.json").exists()
    finish(weakseg("run", str(killed_cfg)))
    a = json.loads((full / "results.json").read_text())
    b = json.loads((killed / "results.json").read_text())
    assert a["stages"] == b["stages"] and a["pseudo_labels"] == b["pseudo_labels"]
    assert_same_weights(full / "train_seg" / "seg_model.pt", killed / "train_seg" / "seg_model.pt")
    # Every output file (predictions, labels, CAMs, weights) is byte-identical; the logs, the
    # records and the configs name their own folder or times.
    full_files = {k: v for k, v in manifest(full).items() if not k.endswith(("log.csv", ".json", ".yaml"))}
    killed_files = {k: v for k, v in manifest(killed).items() if not k.endswith(("log.csv", ".json", ".yaml"))}
    assert full_files == killed_files


def test_run_record_holds_config_versions_seeds_times_and_a_verifiable_manifest(tmp_path):
    cfg = write_yaml(tmp_path / "cam.yaml", cam_config(epochs=1, seed=7) | {"out": str(tmp_path / "run")})
    pipeline.run_step("train_cam", cfg, log=lambda m: None)
    folder = tmp_path / "run" / "train_cam"
    record = read_record(folder)
    assert record["step"] == "train_cam" and record["status"] == "completed"
    assert record["config"]["train_cam"]["train"]["seed"] == 7 and record["seeds"] == {"train_cam.train.seed": 7}
    assert record["versions"]["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert record["host"]["pid"] == os.getpid()
    assert record["started"] <= record["ended"]
    assert record["result"]["steps"] == 6
    outputs = record["outputs"]
    # The manifest lists every output with its SHA-256, checked here against hashlib directly.
    assert set(outputs) == {"cam_model.pt", "checkpoint.pt", "log.csv"}  # the step markers are bookkeeping
    assert LOCK_NAME not in outputs and "run.json" not in outputs
    import hashlib

    data = (folder / "cam_model.pt").read_bytes()
    assert outputs["cam_model.pt"] == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert verify_outputs(folder) == []
    (folder / "log.csv").write_text("tampered\n")
    assert verify_outputs(folder) == ["log.csv: changed"]


def test_git_commit_is_recorded_from_a_checkout(tmp_path):
    from weakseg.record import git_commit

    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    (repo / "a.txt").write_text("a")
    subprocess.run(git + ["add", "a.txt"], check=True)
    subprocess.run(git + ["commit", "-qm", "a"], check=True)
    head = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    assert git_commit(repo) == {"commit": head, "dirty": False}
    (repo / "a.txt").write_text("b")
    assert git_commit(repo) == {"commit": head, "dirty": True}
    assert git_commit(tmp_path / "elsewhere") is None


def test_find_seeds_and_lock_in_process(tmp_path):
    assert find_seeds({"train_cam": {"train": {"seed": 1}}, "train_seg": {"train": {"seed": 2}}, "x": 3}) == {
        "train_cam.train.seed": 1, "train_seg.train.seed": 2}
    with folder_lock(tmp_path):
        with pytest.raises(RunLocked, match=f"pid {os.getpid()}"):
            with folder_lock(tmp_path):
                pass
    with folder_lock(tmp_path):  # released at the end of the block
        pass


def test_failed_run_is_recorded_and_nonfinite_loss_names_term_and_step(tmp_path, monkeypatch):
    from weakseg.losses.classification import ClassificationTerm

    cfg = write_yaml(tmp_path / "cam.yaml", CAM | {"out": str(tmp_path / "run")})
    original = ClassificationTerm.forward
    calls = {"n": 0}

    def poisoned(self, *args, **kwargs):
        calls["n"] += 1
        value = original(self, *args, **kwargs)
        return value * float("nan") if calls["n"] == 9 else value  # step 9: inside epoch 2

    monkeypatch.setattr(ClassificationTerm, "forward", poisoned)
    with pytest.raises(NonFiniteLoss) as err:
        pipeline.run_step("train_cam", cfg, log=lambda m: None)
    folder = tmp_path / "run" / "train_cam"
    message = str(err.value)
    assert "term cls" in message and "epoch 2, step 9" in message and str(folder / "checkpoint.pt") in message
    checkpoint = torch.load(folder / "checkpoint.pt", weights_only=True)
    assert checkpoint["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in checkpoint["model"].values() if v.is_floating_point())
    assert not (folder / "done.json").exists()
    record = read_record(folder)
    assert record["status"] == "failed" and "NonFiniteLoss" in record["error"]


def test_cli_reports_a_nonfinite_loss_in_one_line(tmp_path):
    cfg = write_yaml(tmp_path / "cam.yaml", cam_config(lr=1e30, optimizer="sgd") | {"out": str(tmp_path / "run")})
    proc = subprocess.run([sys.executable, "-m", "weakseg", "train-cam", str(cfg)], env=ENV, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    said = " ".join((proc.stdout + proc.stderr).split())
    assert "non-finite loss (term" in said and "Traceback" not in said


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch " + os.environ.get("WEAKSEG_PROOF", "/nonexistent"),))


def test_checkpoint_with_code_is_refused_and_nothing_runs(tmp_path, monkeypatch):
    proof = tmp_path / "pwned"
    monkeypatch.setenv("WEAKSEG_PROOF", str(proof))
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "model_config": {}, "class_names": [], "payload": _Exploit()}, path)
    from weakseg.data import build_dataset

    with pytest.raises(DataError, match="holds code and was refused") as err:
        infer_cam.infer_cams(path, build_dataset(DATASET), tmp_path / "out", infer_cam.InferCamConfig())
    assert str(path) in str(err.value)
    assert not proof.exists()
    # The resume path reads checkpoints through the same loader: an interrupted train_cam of
    # this config (started.json with its hash) whose checkpoint was replaced.
    run = tmp_path / "run"
    cfg = write_yaml(tmp_path / "cam.yaml", CAM | {"out": str(run)})
    config, base_dir = pipeline.load_config(cfg)
    digest = pipeline.hashes_of(config, pipeline._saved(config, base_dir))["train_cam"]
    (run / "train_cam").mkdir(parents=True)
    (run / "train_cam" / "started.json").write_text(json.dumps({"hash": digest}))
    torch.save({"model": {}, "epoch": 1, "payload": _Exploit()}, run / "train_cam" / "checkpoint.pt")
    with pytest.raises(DataError, match="holds code and was refused") as err:
        pipeline.run_step("train_cam", cfg, log=lambda m: None)
    assert str(run / "train_cam" / "checkpoint.pt") in str(err.value)
    assert not proof.exists()


def test_sha256_matches_hashlib(tmp_path):
    import hashlib

    path = tmp_path / "x.bin"
    data = os.urandom(3 << 20)
    path.write_bytes(data)
    assert sha256_file(path, chunk=1000) == hashlib.sha256(data).hexdigest()


def test_failed_checkpoint_write_names_the_file_and_leaves_the_old_one(tmp_path, monkeypatch):
    # A full disk made torch's zip writer fail with "unexpected pos ..." mid-write (seen on a
    # real run): the error must name the checkpoint and the free space, and the previous
    # checkpoint must survive with no temp file beside it.
    from weakseg.errors import WeaksegError
    from weakseg.train import trainer

    path = tmp_path / "checkpoint.pt"
    trainer.save_checkpoint(path, {"step": torch.tensor(1)})
    before = path.read_bytes()

    def failing_save(state, handle):
        handle.write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 115502464 vs 115502356")

    monkeypatch.setattr(trainer.torch, "save", failing_save)
    with pytest.raises(WeaksegError, match=r"checkpoint\.pt: could not write the checkpoint \(\d+ MiB free"):
        trainer.save_checkpoint(path, {"step": torch.tensor(2)})
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]
