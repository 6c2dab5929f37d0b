"""The committed ZDS bindings are exactly what grpcio-tools generates from zds.proto now."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_regenerating_changes_nothing(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-I.",
            f"--python_out={tmp_path}",
            f"--pyi_out={tmp_path}",
            "node_agent/zds.proto",
        ],
        cwd=ROOT,
        check=True,
    )
    for name in ("zds_pb2.py", "zds_pb2.pyi"):
        fresh = (tmp_path / "node_agent" / name).read_text()
        committed = (ROOT / "node_agent" / name).read_text()
        assert fresh == committed, f"{name} is stale: run scripts/gen-proto.sh and commit it"


def test_field_numbers_are_the_contract() -> None:
    from node_agent import zds_pb2 as pb

    def nums(msg: type) -> dict[str, int]:
        return {f.name: f.number for f in msg.DESCRIPTOR.fields}  # type: ignore[attr-defined]

    assert pb.DESCRIPTOR.package == "istio.workload.zds"
    assert nums(pb.WorkloadRequest) == {"add": 1, "del": 2, "snapshot_sent": 3, "keep": 5}
    assert nums(pb.WorkloadInfo) == {"name": 1, "namespace": 2, "service_account": 3}
    assert nums(pb.AddWorkload) == {"uid": 1, "workload_info": 2}
    assert nums(pb.DelWorkload) == {"uid": 2}
    assert nums(pb.KeepWorkload) == {"uid": 1}
    assert nums(pb.WorkloadResponse) == {"ack": 1}
    assert nums(pb.Ack) == {"error": 1}
    assert nums(pb.ZdsHello) == {"version": 1}
    assert dict(pb.Version.items()) == {"NOT_USED": 0, "V1": 1}
