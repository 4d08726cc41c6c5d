"""Model code: the tiny base model (given) and the student files lora.py and quant.py.

Which lora.py / quant.py is loaded is decided by ``LORA_IMPL`` (see ``model/_impl.py``).
"""

from model._impl import install

install()
