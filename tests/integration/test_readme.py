"""The README's two commands are the project's contract with a new user: keep them honest."""
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _command_after(marker: str) -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    match = re.search(re.escape(marker) + r"\s*```bash\n(.+?)\n```", text)
    assert match, f"README.md has no ```bash block after {marker}"
    return match.group(1).strip()


def test_ci_runs_exactly_the_readme_test_command():
    readme_cmd = _command_after("<!-- test-command -->")
    # Ask .ci/run's own extraction which command it would run (same awk, no execution).
    script = (ROOT / ".ci" / "run").read_text()
    awk = re.search(r"cmd=\$\((awk .+? README\.md)\)", script)
    assert awk, ".ci/run no longer extracts the command from README.md"
    extracted = subprocess.run(["bash", "-c", awk.group(1)], cwd=ROOT, capture_output=True,
                               text=True, check=True).stdout.strip()
    assert extracted == readme_cmd
    assert "pytest" in readme_cmd and "pip install -e" in readme_cmd
    # the linter (pyproject.toml) gates the suite
    assert readme_cmd.index("ruff check .") < readme_cmd.index("python -m pytest")


def test_quickstart_command_points_at_existing_script():
    cmd = _command_after("<!-- quickstart-command -->")
    scripts = re.findall(r"bash (\S+\.sh)", cmd)
    assert scripts, cmd
    for script in scripts:
        assert (ROOT / script).is_file(), f"README quick start runs {script}, which does not exist"
    # Both commands must install the CPU torch before anything that depends on torch.
    for marker in ("<!-- quickstart-command -->", "<!-- test-command -->"):
        c = _command_after(marker)
        assert c.index("pip install torch==") < c.index("pip install -e")
