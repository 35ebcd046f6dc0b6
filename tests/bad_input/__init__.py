"""The bad-input matrix of test_bad_input_props.py (issue 26): every public op of pyeditor under
bad, unusual and valid strided input, judged against pyeditor.reference. core: the case type and
random inputs; edit, hyper, search, quant: the cases of each op family; ops: the registered ops
called directly; run: the judge and the subprocess entry point (python -m bad_input.run)."""
