"""ctscreen: overnight chest CT screening for suspected COVID-19 pneumonia.

The data flow is the package layout; read ``pipeline/run.py`` first.
"""

__version__ = "0.1.0"
ALGORITHM_NAME = "ctscreen"
