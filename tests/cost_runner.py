"""Run readers and commands on crafted files, each under a bound, for tests/test_cost_bounds.py (issue 16 item 1).

    python tests/cost_runner.py PLAN.json

PLAN: {"valid": {kind: path}, "model": path, "workdir": path, "jobs": [[file, kind, target], ...]}, and
optionally "cpu_bound_s" and "memory_bound_mb" (for the test that proves the bounds bite).

The process imports everything and runs every target once on a valid file (lazy imports, the demo's model, the
loopback Hub), so what it holds then is "the idle process". Before each job it caps its address space at what
it has mapped plus 300 MiB (RLIMIT_AS) and its CPU time at what it has used plus 10 s (RLIMIT_CPU: past it the
kernel ends the process with SIGXCPU). It prints `START i` before job i and `COST {json}` after it: the outcome
(ok, refused with our one line, or crash with the exception), CPU and wall seconds, and the peak resident memory
above the idle process (VmHWM, reset per job through /proc/self/clear_refs). A job that kills the process is
found by the test from the last START; it runs the rest in a new process.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import io
import json
import os
import resource
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

MEMORY_BOUND = 300 << 20
CPU_BOUND_S = 10
REPO_ID = "mallory/crafted"

sys.path.insert(0, str(Path(__file__).parent))


def _status(field: str) -> int:
    """A /proc/self/status figure in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class Runner:
    """The targets: each a callable on one file, the way a command, the demo or a Hub pull reaches it."""

    def __init__(self, plan: dict) -> None:
        import torch

        torch.set_num_threads(1)
        from hub_server import HubServer

        self.plan = plan
        self.work = Path(plan["workdir"])
        self.hub = HubServer().__enter__()
        os.environ["HF_ENDPOINT"] = self.hub.url  # before huggingface_hub is imported, for the demo's pulls
        from rwkv_state_hub.demo import DemoEngine

        self.engine = DemoEngine(plan["model"])
        self.repos = 0
        self.model_sha256 = hashlib.sha256(Path(plan["model"]).read_bytes()).hexdigest()
        self.cpu_bound_s = plan.get("cpu_bound_s", CPU_BOUND_S)
        self.memory_bound = plan.get("memory_bound_mb", MEMORY_BOUND >> 20) << 20
        self.targets: dict[str, Callable[[str, str], str | None]] = {
            "load_state": self.load_state, "info": self.info, "check": self.check, "export": self.export,
            "upload": self.upload, "pull": self.pull, "demo-states": self.demo_states,
            "read_spec": self.read_spec, "check --model": self.check_model, "train --model": self.train_model,
            "read_manifest": self.read_manifest, "load_dataset": self.load_dataset, "eval --data": self.eval_data,
            "train --data": self.train_data, "get_tokenizer": self.get_tokenizer,
            "train --tokenizer": self.train_tokenizer, "allocate": self.allocate, "spin": self.spin,
        }

    # ------------------------------------------------------------ the targets

    def _cli(self, *args: str) -> None:
        from rwkv_state_hub.cli import cli

        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            cli.main(list(args), prog_name="rwkv-state", standalone_mode=False)

    def load_state(self, path: str, kind: str) -> None:
        from rwkv_state_hub import load_state

        load_state(path)

    def info(self, path: str, kind: str) -> None:
        self._cli("info", path)

    def check(self, path: str, kind: str) -> None:
        self._cli("check", path, "--model", self.plan["model"], "--force")

    def export(self, path: str, kind: str) -> None:
        self._cli("export", path, "--format", "pth", "-o", str(self.work / "exported.pth"))

    def upload(self, path: str, kind: str) -> None:
        from rwkv_state_hub.demo import new_session

        self.engine.load_upload(path, new_session())

    def _repo(self, path: str, kind: str, role: str = "native") -> str:
        """A new loopback Hub repo with this file as its manifest, or as its `role` state file under a manifest
        that matches it (a .pth file as the pth file: torch.load reads any file named .safetensors as one)."""
        from fuzz_inputs import manifest_for

        from rwkv_state_hub.hub_card import MANIFEST, REPO_FILES

        self.repos += 1
        repo = f"{REPO_ID}-{self.repos}"
        data = Path(path).read_bytes()
        files = {"native": ("state.safetensors", Path(self.plan["valid"]["safetensors"]).read_bytes())}
        if kind != "manifest":
            files[role] = (REPO_FILES[role], data)
        for name, content in files.values():
            self.hub.add_file(repo, name, content)
        manifest = data if kind == "manifest" else json.dumps(manifest_for(files, self.model_sha256)).encode()
        self.hub.add_file(repo, MANIFEST, manifest)
        return repo

    def pull(self, path: str, kind: str) -> None:
        from rwkv_state_hub.hub import pull

        role = "pth" if path.endswith(".pth") else "native"
        pull(self._repo(path, kind, role), None, fmt=role, endpoint=self.hub.url)

    def demo_states(self, path: str, kind: str) -> str | None:
        """`rwkv-state demo --states owner/name`: a bad repo must end up under "Not offered", never stop the demo."""
        before = len(self.engine.skipped)
        self.engine._add_entry(self._repo(path, kind))
        return self.engine.skipped[-1] if len(self.engine.skipped) > before else None

    def read_spec(self, path: str, kind: str) -> None:
        from rwkv_state_hub import read_spec

        read_spec(path)

    def check_model(self, path: str, kind: str) -> None:
        self._cli("check", self.plan["valid"]["safetensors"], "--model", path)

    def train_model(self, path: str, kind: str) -> None:
        self._cli("train", "--model", path, "--data", self.plan["valid"]["jsonl"], "--dry-run",
                  "--out", str(self.work / "run"))

    def read_manifest(self, path: str, kind: str) -> None:
        from rwkv_state_hub.hub_card import read_manifest

        read_manifest(path, f"{REPO_ID}/rwkv-state.json")

    def load_dataset(self, path: str, kind: str) -> None:
        from rwkv_state_hub.data import load_dataset
        from rwkv_state_hub.tokenizer import ByteTokenizer

        load_dataset(path, ByteTokenizer("utf-8"), 64, 256)

    def eval_data(self, path: str, kind: str) -> None:
        self._cli("eval", "--model", self.plan["model"], "--data", path, "--ctx-len", "64")

    def train_data(self, path: str, kind: str) -> None:
        self._cli("train", "--model", self.plan["model"], "--data", path, "--dry-run", "--out", str(self.work / "run"))

    def get_tokenizer(self, path: str, kind: str) -> None:
        from rwkv_state_hub.tokenizer import get_tokenizer

        get_tokenizer(path)

    def train_tokenizer(self, path: str, kind: str) -> None:
        self._cli("train", "--model", self.plan["model"], "--data", self.plan["valid"]["jsonl"], "--tokenizer", path,
                  "--dry-run", "--out", str(self.work / "run"))

    def allocate(self, path: str, kind: str) -> None:
        """A reader that trusts a claim: allocates as many bytes as the file says."""
        bytearray(int(Path(path).read_text()))

    def spin(self, path: str, kind: str) -> None:
        """A reader that loops as long as the file says (in CPU seconds)."""
        end = _cpu_seconds() + float(Path(path).read_text())
        while _cpu_seconds() < end:
            pass

    # ------------------------------------------------------------ measuring

    def warm_up(self) -> None:
        """Every target once on a valid file of its kind: what stays after that is the idle process."""
        done = set()
        for _, kind, target in self.plan["jobs"]:
            if (kind, target) not in done:
                done.add((kind, target))
                self.targets[target](self.plan["valid"][kind], kind)

    def measure(self, path: str, kind: str, target: str) -> dict:
        gc.collect()
        try:  # resets VmHWM to the current RSS (Linux >= 4.0); without it only RLIMIT_AS bounds the job
            Path("/proc/self/clear_refs").write_text("5")
            peak_known = True
        except OSError:
            peak_known = False
        idle_rss = _status("VmRSS")
        _, hard_as = resource.getrlimit(resource.RLIMIT_AS)
        _, hard_cpu = resource.getrlimit(resource.RLIMIT_CPU)
        cpu0, wall0 = _cpu_seconds(), time.monotonic()
        resource.setrlimit(resource.RLIMIT_CPU, (int(cpu0) + 1 + self.cpu_bound_s, hard_cpu))
        resource.setrlimit(resource.RLIMIT_AS, (_status("VmSize") + self.memory_bound, hard_as))
        row = {"path": path, "file": Path(path).name, "kind": kind, "target": target}
        error = None
        try:
            row.update(outcome="ok", message=self.targets[target](path, kind))
        except BaseException as e:  # noqa: BLE001 - what escaped is the finding; SystemExit included
            error = e
        finally:
            resource.setrlimit(resource.RLIMIT_AS, (hard_as, hard_as))
            resource.setrlimit(resource.RLIMIT_CPU, (hard_cpu, hard_cpu))
        if error is not None:  # described only now: a MemoryError leaves no room to describe it in
            row.update(_classify(error))
        row.update(cpu_s=round(_cpu_seconds() - cpu0, 2), wall_s=round(time.monotonic() - wall0, 2),
                   peak_mb_above_idle=round(max(0, _status("VmHWM") - idle_rss) / 2**20, 1) if peak_known else None,
                   ru_maxrss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1))
        return row


def _classify(e: BaseException) -> dict:
    """Our one line (StateHubError, or the ClickException the CLI turns it into) is a refusal; all else a crash."""
    import click

    from rwkv_state_hub import StateHubError

    if isinstance(e, StateHubError):
        return {"outcome": "refused", "message": str(e)}
    if isinstance(e, click.ClickException):
        return {"outcome": "refused", "message": e.format_message()}
    where = traceback.extract_tb(e.__traceback__)[-1] if e.__traceback__ else None
    at = f" at {Path(where.filename).name}:{where.lineno}" if where else ""
    return {"outcome": "crash", "message": f"{type(e).__name__}: {str(e)[:300]}{at}"}


def main() -> None:
    plan = json.loads(Path(sys.argv[1]).read_text())
    out = sys.stdout
    runner = Runner(plan)
    runner.warm_up()
    print("IDLE " + json.dumps({"rss_mb": round(_status("VmRSS") / 2**20, 1),
                                "vm_mb": round(_status("VmSize") / 2**20, 1)}), file=out, flush=True)
    for i, (path, kind, target) in enumerate(plan["jobs"]):
        print(f"START {i}", file=out, flush=True)
        row = runner.measure(path, kind, target)
        row["sha256"] = hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]
        print("COST " + json.dumps(row), file=out, flush=True)
    os._exit(0)  # the Hub thread and the demo's pools need no orderly goodbye


if __name__ == "__main__":
    main()
