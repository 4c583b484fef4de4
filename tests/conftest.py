"""Project tests use busreg's own pytest plugin (busreg.testing, loaded by entry point), so
the plugin is exercised on every run through the BUSREG_TEST_*_URL path."""
