"""The teacher cache: the teacher's top-k log-probabilities per supervised position, computed once.

- `key.py`: what a cache was computed from (teacher weights, tokenizer, data, k) and where it lives.
- `store.py`: the on-disk format, its writer and its memory-mapped reader.
- `build.py`: `python -m trainer.cache` runs the teacher over the data, resumably, on any ranks.
- `identity.py`: a cache's identity for one job, and the check that the one on disk is it.
- `tail.py`: entries drawn from the teacher's tail beside its exact top tokens (teacher.tail_samples).
- `teacher.py`: the cached teacher, behind the same `Teacher` interface as a model (trainer/models/teacher.py).
- `cross.py`: a cache built across tokenizers (loss.cross_tokenizer), which serves students of any tokenizer.
- `from_api.py`: `python -m trainer.cache.from_api` turns an API dump into a dataset and a cache.
"""
