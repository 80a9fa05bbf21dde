"""The study: does the simplex generalise better? The grid and its methods (``spec``), training its units
(``run``), the statistics, table and plot (``report``); ``python -m dist_subspace.study`` (``__main__``)."""
