from cryocli.cli.app import main

main()
