"""Tools: things done with a trained model (sdt eval, predict, fid, export-hub, export/convert, viz, sample, models),
each a module of functions the ``sdt`` command calls."""
