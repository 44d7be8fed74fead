"""The fine-tune step on several processes: DDP, or FSDP with ``train.fsdp``.

The flow calls ``finetune`` in its own process as always. When ``train.num_processes`` is above
one ("auto": one per visible GPU), ``finetune`` hands over to ``run_ranks`` before loading
anything: it writes the step's inputs to ``<run_dir>/launch/inputs.json`` and runs

    accelerate launch --multi_gpu --num_processes N [FSDP options] -m flows.production.launch inputs.json

Each rank runs ``finetune`` on the same inputs. The Trainer gives every rank its share of each
global batch (``train.batch_size`` per process, so the global batch is N times it) and averages
the gradients; on the CPU over gloo, on GPUs over NCCL (accelerate picks). The strategies combine
what they measure across ranks (``cf_strategies.distributed``); ``saves_candidate`` checks that
their state agrees on every rank, then rank 0 alone writes the candidate folder, the strategies'
state and ``launch/result.json`` while the others wait at a barrier. ``run_ranks`` returns the
``TrainResult`` it reads there, so the flow goes on as after a one-process step.

Every rank's stderr (Python's: warnings, logs, progress, tracebacks) is also kept in
``launch/rank<r>.log``, and a rank that fails writes its error to ``launch/rank<r>.error``. The
flow then raises :class:`RankFailedError` with the failed ranks' errors and the tail of the log
of the first of them.

FSDP (``train.fsdp``, for a model that does not fit one GPU) shards the weights over the ranks
(accelerate's FSDP2, one shard unit per transformer block). The ranks read the champion on the
CPU (``sharded``) and accelerate moves each rank's shard to its GPU, after broadcasting rank 0's
weights (``--fsdp_cpu_ram_efficient_loading``), so no GPU ever holds the whole model. Only
strategies that reach the weights through the model's forward pass run under it
(``Strategy.shard_safe``). At the end the adapter's shards are gathered (``gathered_adapter``)
and rank 0 puts them on the champion, on the CPU, to write the candidate.

accelerate shards only on accelerators; torch's FSDP2 also runs on CPU ranks over gloo.
``FORGETLESS_FSDP_ON_CPU=1`` lets the ranks do that (``allow_fsdp_on_cpu``): slow, but the same
sharding, loading and gathering as on GPUs, for the tests and for trying ``train.fsdp`` on a
machine without one.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import traceback
from pathlib import Path

from cf_strategies import distributed
from flows.core.records import ChampionRef, TrainResult
from flows.steps.finetune import FinetuneStep, check_padding_free, finetune
from flows.steps.ranks import FSDP_ON_CPU, LAUNCH_DIR, check_ranks, launched_world, process_count

INPUTS, RESULT = "inputs.json", "result.json"  # in the run folder's LAUNCH_DIR
LOG_TAIL_LINES = 40
PR_SET_PDEATHSIG = 1  # linux/prctl.h


class RankFailedError(RuntimeError):
    """A rank of a multi-process fine-tune failed; the message holds its error and log tail."""


def allow_fsdp_on_cpu() -> None:
    """Let accelerate run FSDP on CPU ranks (gloo), which torch's FSDP2 supports but accelerate
    does not offer: its state marks a launch without accelerators as multi-CPU DDP even with an
    FSDP plugin; this marks it FSDP with that plugin, as it does on GPUs. Inside a rank only,
    with ``FORGETLESS_FSDP_ON_CPU=1`` (module doc)."""
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    init = AcceleratorState.__init__

    def init_with_fsdp(self, *args, fsdp_plugin=None, **kwargs):
        init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if self.distributed_type == DistributedType.MULTI_CPU and fsdp_plugin is not None:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin

    AcceleratorState.__init__ = init_with_fsdp


def train(
    step: FinetuneStep, champion: ChampionRef, release_dir: Path, run_dir: Path
) -> TrainResult:
    """The fine-tune step: in this process, or on every rank when ``train.num_processes`` asks
    for several (``run_ranks``)."""
    if wants_ranks(step):
        return run_ranks(step, champion, release_dir, run_dir)
    return finetune(step, champion, release_dir, run_dir)


def wants_ranks(step: FinetuneStep) -> bool:
    """True in the flow's process when the step is to run on several processes; False inside a
    rank (which trains itself) and for one process."""
    return launched_world() == 1 and process_count(step.train) > 1


def free_port() -> int:
    """A TCP port free now on this machine, for the ranks' rendezvous (two launches at once,
    e.g. parallel candidates, must not share one)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(inputs: Path, processes: int, fsdp: bool, port: int) -> list[str]:
    """The ``accelerate launch`` command line that runs ``python -m flows.production.launch inputs``."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    cmd += ["--num_processes", str(processes), "--num_machines", "1"]
    cmd += ["--main_process_port", str(port), "--mixed_precision", "no"]  # bf16: TrainingArguments
    cmd += ["--dynamo_backend", "no"]
    if fsdp:
        cmd += ["--use_fsdp", "--fsdp_version", "2"]
        cmd += ["--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP"]  # the model's block class
        # checkpoints: each rank writes its shards of the adapter and the optimizer state (torch's
        # distributed checkpoint); the candidate's adapter is gathered apart (gathered_adapter)
        cmd += ["--fsdp_state_dict_type", "SHARDED_STATE_DICT"]
        cmd += ["--fsdp_cpu_ram_efficient_loading", "true"]  # rank 0's weights, broadcast
    else:
        cmd += ["--multi_gpu"]  # DDP: on GPUs over NCCL, else on the CPU over gloo
    return [*cmd, "-m", "flows.production.launch", str(inputs)]


def run_ranks(
    step: FinetuneStep, champion: ChampionRef, release_dir: Path, run_dir: Path
) -> TrainResult:
    """Run the fine-tune step on ``process_count`` ranks and return rank 0's result."""
    processes = process_count(step.train)
    check_padding_free(step.train)  # what several ranks cannot run is refused before they start
    check_ranks(step.train, processes)
    folder = Path(run_dir) / LAUNCH_DIR
    folder.mkdir(parents=True, exist_ok=True)
    for stale in [*folder.glob("rank*.error"), folder / RESULT]:
        stale.unlink(missing_ok=True)
    inputs = folder / INPUTS
    inputs.write_text(
        json.dumps(
            {
                "step": step.model_dump(mode="json"),
                "champion": champion.model_dump(mode="json"),
                "release_dir": str(Path(release_dir).resolve()),
                "run_dir": str(Path(run_dir).resolve()),
            },
            indent=1,
        )
    )
    env = {**os.environ, "PYTHONPATH": _import_path()}
    env.setdefault("OMP_NUM_THREADS", "1")  # torch's threads × ranks would oversubscribe
    cmd = launch_command(inputs, processes, step.train.fsdp, free_port())
    done = subprocess.run(cmd, env=env, check=False, preexec_fn=die_with_parent)
    if done.returncode != 0 or not (folder / RESULT).exists():
        raise RankFailedError(failure_report(folder, processes, done.returncode))
    return TrainResult.read(folder / RESULT)


def die_with_parent() -> None:
    """Linux: have the kernel SIGKILL this process when its parent dies (``prctl``
    PR_SET_PDEATHSIG). The launcher gets it from the flow's process and every rank from the
    launcher (torch starts ranks in sessions of their own, out of reach of a process-group
    kill), so a killed flow leaves no rank training on and writing into the run folder a
    retry resumes from. A no-op elsewhere."""
    if sys.platform != "linux":
        return
    parent = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the request took effect
        os.kill(os.getpid(), signal.SIGKILL)


def _import_path() -> str:
    """PYTHONPATH for the ranks: this checkout first, so ``-m flows.production.launch`` is this code."""
    root = str(Path(__file__).resolve().parents[2])
    return os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])])


def failure_report(folder: Path, processes: int, returncode: int) -> str:
    """What went wrong: each failed rank's error, then the tail of the first failed rank's log
    (of every rank's when none wrote an error, e.g. one was killed)."""
    failed = sorted(int(f.stem.removeprefix("rank")) for f in folder.glob("rank*.error"))
    parts = [
        f"the fine-tune step failed on {len(failed) or 'some'} of {processes} ranks "
        f"(launcher exit code {returncode}); every rank's log is in {folder}"
    ]
    parts += [f"rank {r} failed: {(folder / f'rank{r}.error').read_text().strip()}" for r in failed]
    for r in failed[:1] or range(processes):
        log = folder / f"rank{r}.log"
        tail = (
            log.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:] if log.exists() else []
        )
        parts.append(f"--- rank {r} stderr, last {len(tail)} lines ---\n" + "\n".join(tail))
    return "\n".join(parts)


class _Tee:
    """A text stream that writes to two (a rank's stderr: the console and its log file)."""

    def __init__(self, *streams):
        self.streams = streams

    def write(self, text: str) -> int:
        for s in self.streams:
            s.write(text)
            s.flush()
        return len(text)

    def flush(self) -> None:
        for s in self.streams:
            s.flush()

    def isatty(self) -> bool:
        return False


def main(argv: list[str] | None = None) -> int:
    """One rank: run ``finetune`` on the inputs ``run_ranks`` wrote; rank 0 writes the result."""
    inputs = Path((argv if argv is not None else sys.argv[1:])[0])
    folder = inputs.parent
    rank = int(os.environ.get("RANK", "0"))
    die_with_parent()
    log = (folder / f"rank{rank}.log").open("w", encoding="utf-8")
    sys.stderr = _Tee(sys.__stderr__, log)  # before the imports: loggers bind to it
    try:
        if os.environ.get(FSDP_ON_CPU) == "1":
            allow_fsdp_on_cpu()
        spec = json.loads(inputs.read_text())
        result = finetune(
            FinetuneStep.model_validate(spec["step"]),
            ChampionRef.model_validate(spec["champion"]),
            Path(spec["release_dir"]),
            Path(spec["run_dir"]),
        )
        distributed.barrier()  # the other ranks wait for rank 0's candidate
        if rank == 0:
            result.write(folder / RESULT)
    except BaseException as err:
        log.write("".join(traceback.format_exception(err)))
        (folder / f"rank{rank}.error").write_text(f"{type(err).__name__}: {err}\n")
        raise
    finally:
        sys.stderr = sys.__stderr__
        log.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
