"""CoT cold start: teacher trajectories for each QA record, kept only when they verify.

python main.py --config=configs/distill.py                  # tiny default: KG teacher, offline
python main.py --config=configs/distill.py --config.teacher.kind=http \
  --config.teacher.base_url=http://127.0.0.1:8000/v1 --config.teacher.model=openai/gpt-oss-120b

Reads the QA records `python main.py --config=configs/synthesize.py --workdir=runs/synthesize`
writes; writes `<workdir>/train.jsonl` and `<workdir>/validation.jsonl` (SFT chats), the
per-record log `<workdir>/trajectories/<split>.jsonl` (a rerun resumes from it) and
`report.json`.
"""

import ml_collections


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    del arg  # no presets
    config = ml_collections.ConfigDict()
    config.task = "distill"
    config.compile_cache = ""  # persistent XLA cache: "" = <workdir>/../xla_cache, a dir (local or gs://), or "none"
    # split name -> QA-record JSONL; an empty path skips the split
    config.data = ml_collections.ConfigDict(dict(
        train="runs/synthesize/train.jsonl", validation="runs/synthesize/validation.jsonl"))
    config.max_records = 0  # per split; 0 = all
    config.teacher = ml_collections.ConfigDict(dict(
        kind="kg",  # "kg" (offline, synthesised questions only), "http" (OpenAI-compatible) or
        # "local" (an HF model directory run by our engine: hf_path, dtype)
        base_url="", model="", api_key_env="", max_concurrency=8, timeout_s=600.0, max_retries=5,
        hf_path="", dtype=""))
    config.collect = ml_collections.ConfigDict(dict(
        k=4, answer_conditioned=True, refine_rounds=2, keep="shortest", min_chars=20,
        max_chars=8000, temperature=0.7, max_tokens=4096, chunk=32))
    return config
