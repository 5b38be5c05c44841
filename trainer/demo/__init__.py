"""The embedded demo's assets: a small teacher the project trains itself, a half-depth student
cut from it, and an addition task to distil on. Everything is built locally (no download) and
cached, so `python -m trainer` with no overrides runs on a laptop CPU with no network.

- `task.py`: the addition task, written out column by column; `tokenizer.py`: its characters.
- `teacher.py`: a small Llama trained on the task; `student.py`: the teacher with layers dropped.
- `cross_student.py`: that student re-headed for a tokenizer of its own (two digits a token), built
  on first use next to the demo assets, for `experiment=demo_cross_tokenizer`.
- `recipe.py`: everything that decides the assets (its hash names their cache folder).
- `assets.py`: builds them once and finds them in the cache after that.
- `metrics.py`: the task's exact-match score.
"""

from trainer.demo.assets import DemoAssets, build_demo_assets
from trainer.demo.cross_student import build_cross_tokenizer_student
from trainer.demo.metrics import exact_match_rate
from trainer.demo.recipe import DemoRecipe

__all__ = ["DemoAssets", "DemoRecipe", "build_cross_tokenizer_student", "build_demo_assets", "exact_match_rate"]
