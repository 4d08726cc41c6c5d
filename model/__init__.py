"""Model code: the tiny base model (given) and the student files lora.py, quant.py and lora_variants.py.

Which of them is loaded is decided by ``LORA_IMPL`` (see ``model/_impl.py``).
"""

from model._impl import install

install()
