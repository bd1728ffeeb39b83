"""Pure rules: errors and exit codes, names, extents, units, fault points, retention. No I/O."""
