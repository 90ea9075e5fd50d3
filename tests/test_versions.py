"""The DeepSpeed range is stated once per place that needs it, and every statement agrees."""
import re
from pathlib import Path

from ffc_parallel import deepspeed_bridge

ROOT = Path(__file__).resolve().parents[1]


def test_setup_cfg_the_bridge_and_ci_agree_on_the_deepspeed_range():
    cfg = (ROOT / "setup.cfg").read_text()
    specs = set(re.findall(r"^\s+deepspeed(\S+)$", cfg, flags=re.M))
    assert specs == {deepspeed_bridge.SUPPORTED}, specs
    floor = re.search(r">=([\d.]+)", deepspeed_bridge.SUPPORTED).group(1)
    assert tuple(int(v) for v in floor.split(".")) == deepspeed_bridge._MIN_VERSION
    oldest = re.search(r"^DEEPSPEED_OLDEST=(\S+)", (ROOT / "launch_scripts/run_tests.sh").read_text(), flags=re.M)
    assert oldest.group(1) == floor, "CI must run the integration tests against setup.cfg's floor"
    for version in deepspeed_bridge._KNOWN_BROKEN:
        assert f"!={'.'.join(map(str, version))}" in deepspeed_bridge.SUPPORTED


def test_the_installed_deepspeed_is_in_range():
    found = deepspeed_bridge.version()
    assert deepspeed_bridge._MIN_VERSION <= found < deepspeed_bridge._BELOW
    assert found not in deepspeed_bridge._KNOWN_BROKEN
