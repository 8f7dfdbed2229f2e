"""Interoperation with released artefacts and other tools: OpenAI's published files
(``pull``, ``viz_import``) and a transformers export (``export_hf``).

Model *formats* that ``load_model`` reads (OpenAI's directories, Hub snapshots, an export read
back) live in ``model/``, below this package, so every layer can load them.
"""
