from imgcls.cli import run

run()
