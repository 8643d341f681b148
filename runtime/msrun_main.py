"""The script msrun starts on each rank of a tensor-parallel run (msrun takes a file, not a module)."""
from cogvlm2_lite.runtime.cli import main

main()
