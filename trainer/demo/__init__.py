"""The embedded demo's assets: a small teacher the project trains itself, a half-depth student
cut from it, and an addition task to distil on. Everything is built locally (no download) and
cached, so `python -m trainer` with no overrides runs on a laptop CPU with no network."""

from trainer.demo.assets import DemoAssets, build_demo_assets
from trainer.demo.metrics import exact_match_rate
from trainer.demo.recipe import DemoRecipe

__all__ = ["DemoAssets", "DemoRecipe", "build_demo_assets", "exact_match_rate"]
