"""Shared fixtures: tiny models saved once per test session, tiny videos written per test."""
import importlib
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]  # `import common`, `import tiny`
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a test that reached for the hub fails at once
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

tiny = importlib.import_module("tiny")  # found through the path set above


@pytest.fixture(scope="session")
def video_llava_dir(tmp_path_factory):
    """A tiny random Video-LLaVA (model + processor) saved like a hub checkpoint."""
    return tiny.tiny_video_llava(str(tmp_path_factory.mktemp("tiny-video-llava")))


@pytest.fixture(scope="session")
def onevision_dir(tmp_path_factory):
    """A tiny random LLaVA-OneVision (the second model family) saved like a hub checkpoint."""
    return tiny.tiny_onevision(str(tmp_path_factory.mktemp("tiny-onevision")))


@pytest.fixture(scope="session")
def real_mp4():
    """VideoCon's example clip (a real 10-second YouTube video), skipped where it is not there."""
    return tiny.videocon_file("y5xuvHpDPZQ_000005_000015.mp4")
