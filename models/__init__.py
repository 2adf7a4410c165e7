# Before any longctx module imports transformers (which imports torchao when installed): see the module.
from models.torchao_import_logs import install as _quiet_torchao_import

_quiet_torchao_import()
