"""The ``s3`` case: save and restore to a local SeaweedFS beside raw PUT/GET of the same bytes.

``python -m benchmarks --cases s3`` starts SeaweedFS (``tests/s3server.py``, the test
suite's server) in the work directory, runs the case at every rank count, and stops it.
Tools, in one run against one server: ``distckpt`` (save/load of an ``s3://`` store), ``raw``
(one object per tensor, PUT from tensor memory and ranged GETs into the targets, with the
same obstore client and multipart settings as distckpt's backend: the floor), and ``DCP``
through its fsspec writer over obstore's fsspec adapter where that works.
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Any

from .common import Config, Ctx, MiB, byte_view, make_state
from .tools import Distckpt, State, Tool

URL_VARIABLE = "DISTCKPT_BENCH_S3_URL"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def start_server(workdir: str) -> Any:
    """Start SeaweedFS and point this process's (and its children's) AWS variables at it;
    None (with the reason printed) when it cannot start."""
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    from tests import s3server

    try:
        server = s3server.start(os.path.join(workdir, "seaweedfs"), bucket="bench")
    except s3server.ServerUnavailable as exc:
        print(f"[s3] skipped: {exc}", file=sys.stderr)
        return None
    os.environ.update(server.env)
    os.environ[URL_VARIABLE] = server.url("bench")
    return server


class DistckptS3(Distckpt):
    """distckpt on an ``s3://`` store; cleanup deletes the objects."""

    def cleanup(self, ctx: Ctx, path: str) -> None:
        super().cleanup(ctx, path)
        if ctx.rank == 0:
            from distckpt.storage.store import Store

            Store(path).fs.rmtree(path)
        ctx.barrier()

    def files(self, ctx: Ctx, path: str) -> tuple[int, int]:
        return 0, 0


class RawS3(Tool):
    """One object per tensor through distckpt's S3 backend's own client calls (obstore
    put/get, same multipart part size and concurrency), no manifest, no checksum."""

    name = "raw"

    def _fs(self, path: str) -> Any:
        from distckpt.storage.resolve import filesystem_for

        return filesystem_for(path)

    def save(self, ctx: Ctx, path: str, state: State) -> None:
        fs = self._fs(path)
        for i, t in enumerate(state.values()):
            fs.write_file(f"{path}/rank_{ctx.rank:06d}/{i:06d}", [byte_view(t)])

    def load(self, ctx: Ctx, path: str, targets: State) -> None:
        fs = self._fs(path)
        for i, t in enumerate(targets.values()):
            fs.read_into(f"{path}/rank_{ctx.rank:06d}/{i:06d}", byte_view(t))

    def files(self, ctx: Ctx, path: str) -> tuple[int, int]:
        return 0, 0

    def cleanup(self, ctx: Ctx, path: str) -> None:
        ctx.barrier()
        if ctx.rank == 0:
            self._fs(path).rmtree(path)
        ctx.barrier()


class DcpFsspec(Tool):
    """torch.distributed.checkpoint through its fsspec writer/reader, over obstore's fsspec
    adapter registered for ``s3://`` (DCP's own S3 route needs s3fs)."""

    name = "DCP"

    def __init__(self) -> None:
        from obstore.fsspec import register

        register("s3")

    def save(self, ctx: Ctx, path: str, state: State) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.save(state, storage_writer=FsspecWriter(path, **_fsspec_options()))

    def load(self, ctx: Ctx, path: str, targets: State) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.load(targets, storage_reader=FsspecReader(path, **_fsspec_options()))

    def files(self, ctx: Ctx, path: str) -> tuple[int, int]:
        return 0, 0

    def cleanup(self, ctx: Ctx, path: str) -> None:
        ctx.barrier()
        if ctx.rank == 0:
            from distckpt.storage.resolve import filesystem_for

            filesystem_for(path).rmtree(path)
        ctx.barrier()


def _fsspec_options() -> dict[str, Any]:
    return {
        "endpoint": os.environ["AWS_ENDPOINT_URL"],
        "access_key_id": os.environ["AWS_ACCESS_KEY_ID"],
        "secret_access_key": os.environ["AWS_SECRET_ACCESS_KEY"],
        "region": os.environ["AWS_REGION"],
        "client_options": {"allow_http": True},
    }


def s3_case(ctx: Ctx, cfg: Config) -> list[dict[str, Any]]:
    """Save and restore to the server at ``$DISTCKPT_BENCH_S3_URL`` with every tool."""
    from .cases import io_case, log

    url = os.environ.get(URL_VARIABLE)
    if not url:
        log(ctx, "s3 skipped: no server (see the message above)")
        return []
    tools: list[Tool] = [DistckptS3(), DistckptS3("distckpt in-place", in_place=True), RawS3()]
    try:
        dcp_tool = DcpFsspec()
        probe = f"{url}/dcp-probe-ranks{ctx.world}"
        tiny = make_state(ctx.rank, MiB, 2)
        dcp_tool.save(ctx, probe, tiny)
        dcp_tool.load(ctx, probe, {k: v.clone() for k, v in tiny.items()})
        dcp_tool.cleanup(ctx, probe)
        tools.append(dcp_tool)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # DCP's CheckpointException is a BaseException
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else ""
        log(ctx, f"s3: DCP through fsspec skipped: {type(exc).__name__}: {first}"[:400])
    s3cfg = Config(**{**cfg.to_json(), "workdir": url})
    out: list[dict[str, Any]] = []
    for size in cfg.sizes_mib:
        state = make_state(ctx.rank, size * MiB, cfg.tensors)
        out += io_case(
            ctx,
            s3cfg,
            case="s3",
            state=state,
            tools=tools,
            size_mib=float(size),
            size_label=f"{size} MiB",
        )
        del state
    return out
