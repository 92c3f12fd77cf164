import typer

app = typer.Typer(help="gorp: continual fine-tuning with GORP")
