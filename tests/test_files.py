"""mtf_train/files.py: what the project writes is never seen half-written."""
import pytest

from mtf_train.files import atomic_path, write_atomic

pytestmark = pytest.mark.unit


def test_atomic_path_renames_on_success_and_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "sub" / "x.bin"
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"one")
        assert not target.exists()
    assert target.read_bytes() == b"one"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("writer failed")
    assert target.read_bytes() == b"one" and sorted(p.name for p in target.parent.iterdir()) == ["x.bin"]
    assert write_atomic(tmp_path / "t.sh", "echo\n", mode=0o755).stat().st_mode & 0o777 == 0o755
