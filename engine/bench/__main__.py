from engine.bench.cli import main

main()
