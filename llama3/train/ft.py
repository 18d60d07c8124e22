"""Recovery without a cold start: data-parallel replica groups kept in step by torchft.

torchrun's answer to a dead rank is to stop every process and start the job again (a cold start: imports,
rendezvous, model build, checkpoint load). Here each replica group is its own job; a lighthouse forms a quorum of
the live groups at every step, and the gradients are averaged over that quorum only. When a group dies, the others
notice in the step's all-reduce (or miss its heartbeat at the lighthouse), drop that step's update (it would not
have been averaged over the same replicas everywhere) and go on with the next quorum, without restarting. A group
that comes back (restarted by its own launcher) joins the next quorum and heals: it copies the newest model and
optimizer state from a live peer's memory instead of reading a checkpoint from disk.

    python -m llama3.train.ft lighthouse --min-replicas 1            # once, anywhere the groups can reach
    python -m llama3.train.ft replica --replica 0 --replicas 2 --lighthouse http://HOST:29510 ...   # each group

One process per replica group here (FT-DDP: the quorum's gradient average, then the optimizer step). The batch of step k is the same global batch as the trainer's; a
replica takes block r of it, so while a replica is away its block of each step is skipped (those steps see
fewer rows), which is the difference from a fault-free run. Every line of progress is a JSON record on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import timedelta


def lighthouse(bind: str, min_replicas: int, join_timeout_ms: int = 100, heartbeat_timeout_ms: int = 1000):
    """A torchft lighthouse (it runs in this process's threads; keep the returned object alive)."""
    from torchft._torchft import LighthouseServer
    return LighthouseServer(bind=bind, min_replicas=min_replicas, join_timeout_ms=join_timeout_ms,
                            quorum_tick_ms=20, heartbeat_timeout_ms=heartbeat_timeout_ms)


def emit(**record) -> None:
    print(json.dumps({"time": round(time.time(), 4), **record}), flush=True)


def average_gradients(manager, model) -> None:
    """Average the gradients over the quorum in one flat all-reduce. (torchft 0.2's DistributedDataParallel fails
    on its own assertion once a peer has died mid-step, since the manager then hands back a placeholder work;
    the manager's all-reduce itself records the error, and the step is then not committed.)"""
    import torch
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    flat = torch.cat([g.flatten() for g in grads])
    manager.allreduce(flat).wait()
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def run_replica(opts) -> None:
    started = time.time()
    import torch
    from torch.distributed import TCPStore
    from torchft import Manager, Optimizer, ProcessGroupGloo

    from ..model import Transformer
    from .config import load_config
    from .data import SyntheticTokens
    from .trainer import build_optimizer, lr_multiplier
    imported = time.time()

    cfg = load_config(None, opts.overrides)
    args = cfg.model_args()
    torch.manual_seed(cfg.run.seed)
    model = Transformer(args)
    model.init_weights(std=cfg.model.init_std)
    optimizer = build_optimizer(model, cfg.optim)
    batch_size = cfg.training.batch_size
    if batch_size % opts.replicas:
        raise SystemExit(f"training.batch_size {batch_size} must be a multiple of --replicas {opts.replicas}")
    data = SyntheticTokens(args.vocab_size, batch_size // opts.replicas, cfg.data.seq_len, rank=opts.replica,
                           world_size=opts.replicas, seed=cfg.run.seed)
    built = time.time()

    def state_dict():
        return {"model": model.state_dict(), "optimizer": optimizer.state_dict()}

    def load_state_dict(state):
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])

    # the replica group's own store (one process per group here: nothing else connects to it)
    store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    timeout = timedelta(seconds=opts.timeout_s)
    manager = Manager(pg=ProcessGroupGloo(timeout=timeout), min_replica_size=opts.min_replicas,
                      load_state_dict=load_state_dict, state_dict=state_dict, replica_id=f"replica{opts.replica}",
                      lighthouse_addr=opts.lighthouse, store_addr="127.0.0.1", store_port=store.port, rank=0,
                      world_size=1, timeout=timeout, quorum_timeout=timedelta(seconds=60),
                      connect_timeout=timedelta(seconds=10), heartbeat_interval=timedelta(milliseconds=100),
                      hostname=opts.host)
    ft_optimizer = Optimizer(manager, optimizer)
    emit(event="start", replica=opts.replica, imports_s=imported - started, build_s=built - imported,
         manager_s=time.time() - built, pid=os.getpid())

    while manager.current_step() < cfg.training.steps:
        step = manager.current_step()  # a healed replica has jumped to its peers' step
        for group in optimizer.param_groups:
            group["lr"] = cfg.optim.lr * lr_multiplier(step, cfg.optim, cfg.training.steps)
        data.step = step
        inputs, targets, _ = next(data)
        begin = time.perf_counter()
        ft_optimizer.zero_grad()  # starts this step's quorum
        loss = torch.nn.functional.cross_entropy(model(inputs).flatten(0, 1), targets.flatten(0, 1))
        loss.backward()
        average_gradients(manager, model)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        ft_optimizer.step()  # applied only if every replica in the quorum finished the step
        after = manager.current_step()
        committed = after > step
        # a healing replica's step is not its own: it took its peers' state, and their step with it
        emit(event="step", replica=opts.replica, step=after if committed else step + 1, committed=committed,
             healed_from=step if after > step + 1 else None, loss=loss.item(),
             replicas=manager.num_participants(), step_time_s=time.perf_counter() - begin)
        if opts.kill_at and step + 1 == opts.kill_at and committed:
            emit(event="killed", replica=opts.replica, step=step + 1)
            os._exit(137)  # as SIGKILL would: no goodbye to anyone
    emit(event="end", replica=opts.replica, step=manager.current_step())
    manager.shutdown(wait=False)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m llama3.train.ft", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    lh = sub.add_parser("lighthouse", help="serve the quorum")
    lh.add_argument("--bind", default="[::]:29510")
    lh.add_argument("--min-replicas", type=int, default=1)
    rp = sub.add_parser("replica", help="run one replica group")
    rp.add_argument("--replica", type=int, required=True)
    rp.add_argument("--replicas", type=int, required=True, help="replica groups the batch is split over")
    rp.add_argument("--lighthouse", required=True, help="http://HOST:PORT")
    rp.add_argument("--min-replicas", type=int, default=1)
    rp.add_argument("--timeout-s", type=float, default=2.0, help="a collective slower than this fails the step")
    rp.add_argument("--host", default="127.0.0.1", help="the address peers reach this replica's manager by")
    rp.add_argument("--kill-at", type=int, default=0, help="(fault injection) die after committing this step")
    rp.add_argument("overrides", nargs="*", help="training settings, as for llama3 train")
    opts = ap.parse_args(argv)
    if opts.what == "lighthouse":
        server = lighthouse(opts.bind, opts.min_replicas)
        print(server.address(), flush=True)
        try:
            while True:
                time.sleep(3600)
        finally:
            server.shutdown()
    run_replica(opts)


if __name__ == "__main__":
    sys.exit(main())
