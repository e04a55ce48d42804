"""Small helpers every stage uses: files written atomically, memory given back to the OS."""
