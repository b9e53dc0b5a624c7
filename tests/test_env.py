"""`python -m minilora env`: every line has a verdict, and problems are flagged with what to do."""

import subprocess
import sys

from minilora import env


def test_report_covers_every_key_package_and_device():
    rows = env.report()
    items = [item for item, _, _ in rows]
    for name in env.KEY_PACKAGES:
        assert name in items
    assert {"python", "cuda", "cpu threads", "bf16 matmul on cpu"} <= set(items)
    assert all(verdict.split(":")[0].split()[0] in {"ok", "note", "FIX"} for _, _, verdict in rows)


def test_installed_versions_are_in_the_tested_ranges():
    assert [row for row in env.package_rows() if row[2].startswith("FIX")] == []


def test_a_version_outside_the_range_is_flagged(monkeypatch):
    real = env.metadata.version
    monkeypatch.setattr(env.metadata, "version", lambda name: "0.1" if name == "peft" else real(name))
    flagged = [row for row in env.package_rows() if row[2].startswith("FIX")]
    assert [row[0] for row in flagged] == ["peft"] and "make setup" in flagged[0][2]


def test_cli_prints_a_verdict():
    out = subprocess.run([sys.executable, "-m", "minilora", "env"], capture_output=True, text=True, check=True)
    assert "verdict: ready" in out.stdout and "bitsandbytes" in out.stdout
