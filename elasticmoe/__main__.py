from elasticmoe.cli.main import main

main()
