"""Training code: task data and pretraining (given) and the student file qlora_trainer.py.

Which qlora_trainer.py is loaded is decided by ``LORA_IMPL`` (see ``model/_impl.py``).
"""

from model._impl import install

install()
