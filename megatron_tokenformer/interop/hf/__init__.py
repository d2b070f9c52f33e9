"""Source files copied verbatim into a Hugging Face export folder (``trust_remote_code``); they must
import nothing of this package (checked by a test)."""

import os

HF_DIR = os.path.dirname(os.path.abspath(__file__))
REMOTE_CODE_FILES = ("configuration_tokenformer.py", "modeling_tokenformer.py")
