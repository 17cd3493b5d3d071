from kdforge.cli import entry_point

entry_point()
