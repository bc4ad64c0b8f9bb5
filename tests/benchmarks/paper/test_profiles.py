"""The profiles: the full one trains the presets exactly as they are."""

from __future__ import annotations

from lipdeq.benchmarks import paper
from lipdeq.benchmarks.paper.running import expected_steps
from lipdeq.configs import load_config


def test_full_profile_trains_the_presets_as_they_are() -> None:
    assert paper.FULL.baseline_max_steps is None and not paper.FULL.match_baseline_time
    assert paper.FULL.overrides == ()
    cfg = load_config("lipmdeq_large", list(paper.FULL.overrides))
    assert expected_steps(cfg, 50000) == 200 * (50000 // 128)
    assert load_config("mdeq_large", list(paper.FULL.overrides)).train.pretrain_steps == 20000
