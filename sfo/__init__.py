"""SFO method library: the math and model code. Never imports Ray."""
