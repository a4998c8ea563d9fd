module kubetune.io/tests/controlplane/pause

go 1.26.0
