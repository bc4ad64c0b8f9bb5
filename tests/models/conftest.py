"""Small configurations of the model family that run in seconds on 2 CPU cores."""

from __future__ import annotations

import pytest
import torch

from lipdeq.models import model_config

SMALL = dict(channels=[8, 8], head_channels=[4, 4], final_channels=16, num_groups=4, image_size=16)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def small_lip_cfg():
    return model_config("lipmdeq_tiny", **SMALL)


@pytest.fixture
def small_mdeq_cfg():
    return model_config("mdeq_tiny", **SMALL)
