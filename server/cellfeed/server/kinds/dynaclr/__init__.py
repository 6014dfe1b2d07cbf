"""Time-lapse microscopy (VisCy DynaCLR): experiments, cell index, lineages, positives, patches."""
