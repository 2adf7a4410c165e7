# Installs models/torchao_import_logs.py's filter before this package imports transformers.
import models  # noqa: F401
