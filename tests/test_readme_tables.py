"""README tables are generated from benchmarks/results; this fails when one was edited by hand or
a results file changed without regenerating (fix: python benchmarks/make_tables.py)."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_tables_match_results_files():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "make_tables.py"), "--check"],
                         capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]


def test_check_detects_a_stale_table(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("x\n<!-- table:kernels_cpu -->\nhand-typed numbers\n<!-- /table:kernels_cpu -->\n")
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "make_tables.py"), "--check",
                          "--readme", str(readme)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 1
