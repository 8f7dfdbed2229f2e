"""The model server (FastAPI + uvicorn): OpenAI-compatible completions with per-request circuit
telemetry and policy decisions from ``monitor/``."""
