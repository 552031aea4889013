"""docs/reproduction.md is generated from benchmarks/results/repro_*.json; this fails when the doc
was edited by hand or a results file changed without regenerating it (fix:
python benchmarks/make_repro_doc.py). The check writes nothing (no plot either)."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _check():
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "make_repro_doc.py"), "--check"],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)


def test_reproduction_doc_matches_results_files():
    img = ROOT / "docs" / "img" / "premise.png"
    before = img.stat().st_mtime_ns if img.exists() else None
    out = _check()
    assert out.returncode == 0, ("docs/reproduction.md is stale: run python "
                                 "benchmarks/make_repro_doc.py\n" + out.stdout[-2000:] + out.stderr[-2000:])
    assert (img.stat().st_mtime_ns if img.exists() else None) == before  # --check wrote no plot


def test_check_detects_a_hand_edit(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import make_repro_doc as m
    finally:
        sys.path.pop(0)
    doc = tmp_path / "reproduction.md"
    doc.write_text((ROOT / "docs" / "reproduction.md").read_text().replace("| ", "|  ", 1))
    monkeypatch.setattr(m, "DOC", doc)
    assert m.main(["--check"]) == 1
