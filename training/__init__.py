"""Training code: task data, pretraining and the demos (given) and the student files qlora_trainer.py and memory.py.

Which qlora_trainer.py and memory.py are loaded is decided by ``LORA_IMPL`` (see ``model/_impl.py``).
"""

from model._impl import install

install()
