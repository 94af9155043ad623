"""Integrations with other training front ends (SPEC.md 4.6): `transformers.AftuneCallback` for a
Hugging Face `Trainer` / TRL `SFTTrainer` script, and `trainer_config` (their arguments as aftune
settings). `pip install 'aftune[trl]'`."""
