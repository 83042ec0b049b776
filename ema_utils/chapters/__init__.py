"""The chapters layer: one module per chapter's analysis (report and mitigation for chapters 3-4,
with run_options, chapter 2's options they reuse; activations, concepts, rank test and
directions for chapter 5; narrow, stability and steering for chapter 6), the plots and widgets
the pages show, and the exercise checks."""
