from store.bench.micro import main

main()
