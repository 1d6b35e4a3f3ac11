"""The generated code under libs/altan/v1 is exactly what proto/ generates today ("generated code unchanged")."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]
CHECKED_IN = ROOT / "libs" / "altan" / "v1"


def gen_proto() -> ModuleType:
    spec = importlib.util.spec_from_file_location("altan_gen_proto", ROOT / "scripts" / "gen_proto.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def generated_files(directory: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(directory)): path.read_bytes()
        for path in sorted(directory.rglob("*"))
        if path.is_file() and path.name != "__init__.py" and "__pycache__" not in path.parts
    }


def test_generated_code_matches_the_protos(tmp_path: Path) -> None:
    gen_proto().generate(tmp_path)
    fresh = generated_files(tmp_path / "altan" / "v1")
    checked_in = generated_files(CHECKED_IN)
    assert fresh, "protoc generated nothing"
    assert sorted(fresh) == sorted(checked_in), "generated files missing or extra: run `make proto`"
    drifted = [name for name in fresh if fresh[name] != checked_in[name]]
    assert drifted == [], f"generated code drifted from proto/ (run `make proto`): {drifted}"
    # Nothing was generated outside the package directory.
    assert {p.relative_to(tmp_path).parts[:2] for p in tmp_path.rglob("*.py")} == {("altan", "v1")}


def test_every_proto_has_its_generated_files_and_typed_stubs() -> None:
    protos = sorted((ROOT / "proto" / "altan" / "v1").glob("*.proto"))
    assert protos
    for proto in protos:
        # The .pyi files come from mypy-protobuf: typed messages, and typed grpc.aio stubs and servicers.
        for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi"):
            assert (CHECKED_IN / f"{proto.stem}{suffix}").is_file(), f"{proto.stem}{suffix}"
