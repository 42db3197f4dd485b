import sys
from pathlib import Path

# Test helpers (the spec reference, checkpoint writers) are plain modules in this folder.
sys.path.insert(0, str(Path(__file__).parent))
