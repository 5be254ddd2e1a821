"""kefu-triage: bot-or-human triage for Chinese e-commerce customer service.

Importing the package is cheap and torch-free; training modules import torch themselves.
"""

__version__ = "0.1.0"
