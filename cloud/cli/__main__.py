from cloud.cli.root import main

main()
